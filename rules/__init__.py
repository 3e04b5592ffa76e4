"""The shipped YAML rule files, installed as the package ``ktcore.rule_files``."""
