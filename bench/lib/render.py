"""Render a config template: ${NAME} is replaced by the environment variable NAME.

A variable missing from the environment is an error, so a typo in a template fails the
run instead of producing a config that listens on the wrong port.
"""

import os
import string
import sys


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        template = string.Template(f.read())
    try:
        sys.stdout.write(template.substitute(os.environ))
    except KeyError as e:
        print(f"render: {sys.argv[1]}: variable {e} is not set", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
