"""Only what pyproject.toml cannot say: ship the repository's rules/ as ktcore.rule_files."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ktcore", "ktcore.*"]) + ["ktcore.rule_files"],
    package_dir={"ktcore.rule_files": "rules"},
)
