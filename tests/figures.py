"""Measured figures that tests report (printed at the end of the pytest run by conftest)."""

FIGURES: list[tuple[str, float]] = []


def record(name: str, value: float) -> None:
    FIGURES.append((name, value))
