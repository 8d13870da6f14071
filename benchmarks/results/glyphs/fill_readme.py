#!/usr/bin/env python
"""Paste the result tables into README.md (between their markers), from the results.md
files that experiment.py wrote (rows only: the README says how they were made)."""

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def rows(name: str) -> str:
    path = os.path.join(HERE, name, "results.md")
    if not os.path.isfile(path):
        return f"({name}: not run)"
    lines = open(path).read().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| method"))
    return "\n".join(lines[start:])


def main() -> None:
    path = os.path.join(HERE, "README.md")
    text = open(path).read()
    cnn = rows("idx-cnn") + "\n\n" + rows("idx-cnn-rest")
    for key, table in (("MLP_TABLE", rows("idx-mlp")), ("CNN_TABLE", cnn)):
        text = re.sub(
            rf"<!-- {key} -->.*?<!-- /{key} -->|{key}",
            lambda _m, k=key, t=table: f"<!-- {k} -->\n{t}\n<!-- /{k} -->",
            text,
            flags=re.S,
        )
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
