"""Drafter config presets shipped with the package (JSON files beside this module)."""
