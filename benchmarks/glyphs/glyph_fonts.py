"""The fonts of the glyph data set: which Debian packages provide them, where their files
are, their versions and licences, and which codepoints each font really draws.

Everything here reads local files (``dpkg``'s database, ``/usr/share/doc/<pkg>/copyright``,
the font files through fontTools); nothing is downloaded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

__all__ = [
    "PACKAGES",
    "FONT_EXTENSIONS",
    "FontFile",
    "MissingFontsError",
    "package_fonts",
    "directory_fonts",
    "package_version",
    "package_licence",
    "read_font",
]

# The Debian packages of the default build (about 100 MB installed), with what each adds.
# One line to install them: see PACKAGES_APT below and docs/benchmarks/glyphs.md.
PACKAGES: Dict[str, str] = {
    "fonts-dejavu-core": "DejaVu Sans/Serif/Mono: Latin, Greek, Cyrillic, Armenian, Georgian",
    "fonts-dejavu-extra": "DejaVu condensed, light and oblique styles",
    "fonts-freefont-ttf": "GNU FreeSans/Serif/Mono: Ethiopic, Cherokee, Runic, Indic, math",
    "fonts-liberation2": "Liberation Sans/Serif/Mono",
    "fonts-noto-core": "Noto Sans/Serif per script (Ethiopic, Canadian syllabics, ...)",
    "fonts-urw-base35": "URW's PostScript 35 clones (Times, Helvetica, Palatino, ...)",
    "fonts-sil-abyssinica": "Abyssinica SIL (Ethiopic)",
    "fonts-bpg-georgian": "BPG Georgian families",
    "fonts-linuxlibertine": "Linux Libertine / Biolinum",
    "fonts-sil-charis": "Charis SIL",
    "fonts-sil-gentium": "Gentium",
    "fonts-ebgaramond": "EB Garamond",
    "fonts-lato": "Lato (many weights)",
}
PACKAGES_APT = "apt-get install " + " ".join(PACKAGES)

# Fonts whose glyphs are not plain characters (file name prefix -> why), left out everywhere
EXCLUDED = {
    "LinBiolinum_K": "Linux Biolinum Keyboard draws every character inside a key cap",
}

# FreeType reads Type 1 too, but fontTools cannot check their coverage: TrueType/OpenType only.
FONT_EXTENSIONS = (".ttf", ".otf")


class MissingFontsError(RuntimeError):
    """The fonts the build asks for are not installed."""


@dataclass
class FontFile:
    """One font file and where it comes from."""

    path: str
    package: str
    package_version: str
    licence: str
    sha256: str = ""
    family: str = ""
    style: str = ""
    licence_name_table: str = ""
    codepoints: List[int] = field(default_factory=list, repr=False)

    def record(self) -> dict:
        d = asdict(self)
        d.pop("codepoints")
        return d


def _dpkg(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["dpkg-query", *args], capture_output=True, text=True, check=False, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def package_version(package: str) -> Optional[str]:
    """The installed version of a Debian package, or None (not installed, or no dpkg)."""
    out = _dpkg("-W", "-f=${db:Status-Status} ${Version}", package)
    if not out or not out.startswith("installed "):
        return None
    return out.split(" ", 1)[1].strip()


def package_licence(package: str, font_path: str, doc_root: str = "/usr/share/doc") -> str:
    """The licence Debian's machine-readable copyright file gives ``font_path``: the last
    ``Files:`` stanza whose pattern matches the file's name (DEP-5: the last match wins),
    ``debian/*`` excluded."""
    path = os.path.join(doc_root, package, "copyright")
    if not os.path.isfile(path):
        return "unknown (no /usr/share/doc copyright file)"
    with open(path, encoding="utf-8", errors="replace") as f:
        stanzas = f.read().split("\n\n")
    base = os.path.basename(font_path)
    found = "unknown"
    for st in stanzas:
        files, licence = None, None
        for line in st.splitlines():
            if line.startswith("Files:"):
                files = line[len("Files:") :].split()
            elif line.startswith("License:"):
                licence = line[len("License:") :].strip()
        if not files or not licence:
            continue
        for pat in files:
            head, _, tail = pat.rpartition("/")
            # a named source folder (debian/*, appstream/*) cannot be mapped to an installed
            # file: only patterns valid in any folder ('*.ttf', '*/*.otf') are used
            if head not in ("", "*"):
                continue
            if fnmatch.fnmatchcase(base, tail):
                found = licence
    return found


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_font(font: FontFile, candidates: Optional[set] = None) -> FontFile:
    """Fill in the hash, family/style, the font's own licence line and the codepoints (of
    ``candidates``, or all) its cmap maps to a real glyph (not ``.notdef``; for TrueType
    outlines, not an empty one)."""
    import logging

    from fontTools.ttLib import TTFont

    # fontTools warns about odd 'created' timestamps in some fonts' head table: noise here
    logging.getLogger("fontTools").setLevel(logging.ERROR)

    font.sha256 = _sha256(font.path)
    with TTFont(font.path, lazy=True, fontNumber=0) as tt:
        name = tt["name"]
        font.family = str(name.getBestFamilyName() or "")
        font.style = str(name.getBestSubFamilyName() or "")
        lic = name.getDebugName(13) or ""
        font.licence_name_table = " ".join(lic.split())[:160]
        cmap = tt.getBestCmap() or {}
        glyf = tt["glyf"] if "glyf" in tt else None
        cps = []
        for cp, glyph in cmap.items():
            if glyph == ".notdef" or (candidates is not None and cp not in candidates):
                continue
            if glyf is not None and glyf[glyph].numberOfContours == 0:
                continue  # an empty outline (space-like); CFF fonts are checked by rendering
            cps.append(cp)
        font.codepoints = sorted(cps)
    return font


def _excluded(path: str) -> bool:
    return os.path.basename(path).startswith(tuple(EXCLUDED))


def _font_file(path: str, package: str, version: str) -> FontFile:
    return FontFile(
        path=path,
        package=package,
        package_version=version,
        licence=package_licence(package, path) if package != "-" else "see the font file",
    )


def _owners(paths: Sequence[str]) -> Dict[str, str]:
    """path -> Debian package, for the paths dpkg knows (one dpkg-query call: each call
    costs about a second on a loaded machine)."""
    if not paths:
        return {}
    try:
        out = subprocess.run(
            ["dpkg-query", "-S", *paths], capture_output=True, text=True, check=False, timeout=120
        ).stdout  # exits 1 when some path is unknown, but still lists the others
    except (OSError, subprocess.TimeoutExpired):
        return {}
    owners = {}
    for line in out.splitlines():
        pkgs, sep, path = line.partition(": ")
        if sep and path.strip() in paths and "diversion" not in pkgs:
            owners[path.strip()] = pkgs.split(",")[0].split(":")[0].strip()
    return owners


def package_fonts(packages: Sequence[str]) -> List[FontFile]:
    """The TrueType/OpenType files of installed Debian ``packages`` (sorted by path, each
    file once). Raises :class:`MissingFontsError` naming the missing packages."""
    missing = [p for p in packages if package_version(p) is None]
    if missing:
        raise MissingFontsError(
            f"missing Debian font package(s): {', '.join(missing)}; install them with\n"
            f"  apt-get install {' '.join(missing)}\n"
            "or build from other fonts with --packages P1,P2 or --font-dir DIR"
        )
    seen, fonts = set(), []
    for p in packages:
        listing = _dpkg("-L", p) or ""
        version = package_version(p) or "?"
        for path in sorted(listing.splitlines()):
            if not path.lower().endswith(FONT_EXTENSIONS) or not os.path.isfile(path):
                continue
            if _excluded(path):
                continue
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            fonts.append(_font_file(path, p, version))
    if not fonts:
        raise MissingFontsError(
            f"the package(s) {', '.join(packages)} hold no {'/'.join(FONT_EXTENSIONS)} files"
        )
    return sorted(fonts, key=lambda f: f.path)


def directory_fonts(dirs: Sequence[str]) -> List[FontFile]:
    """The TrueType/OpenType files under ``dirs`` (recursively, sorted by path), with their
    Debian package where dpkg knows the file."""
    paths = []
    for d in dirs:
        if not os.path.isdir(d):
            raise MissingFontsError(f"--font-dir {d!r} is not a directory")
        for root, subdirs, files in os.walk(d):
            subdirs.sort()
            paths += [
                os.path.join(root, f)
                for f in files
                if f.lower().endswith(FONT_EXTENSIONS) and not _excluded(f)
            ]
    reals, seen = [], set()
    for path in sorted(paths):
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            reals.append((path, real))
    owners = _owners([real for _, real in reals])
    versions: Dict[str, str] = {}
    fonts = []
    for path, real in reals:
        package = owners.get(real, "-")
        if package != "-" and package not in versions:
            versions[package] = package_version(package) or "?"
        fonts.append(_font_file(path, package, versions.get(package, "-")))
    if not fonts:
        raise MissingFontsError(
            f"no {'/'.join(FONT_EXTENSIONS)} font files under {', '.join(dirs)}; install e.g. "
            f"fonts-dejavu-core, or the default set: {PACKAGES_APT}"
        )
    return fonts
