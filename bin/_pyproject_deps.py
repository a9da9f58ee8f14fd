"""Print the dependencies pyproject.toml declares, and those of the extras named, one per line.

A requirements file for installing the dependencies before the code (a cached Docker layer,
bin/refresh-constraints):  python bin/_pyproject_deps.py pyproject.toml [EXTRA ...]
"""

import sys
import tomllib

with open(sys.argv[1], "rb") as file:
    project = tomllib.load(file)["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[2:]:
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
