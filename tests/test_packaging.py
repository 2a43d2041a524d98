"""setup.cfg states ranges (a user's CUDA torch stays); constraints.txt pins the tested set inside them."""

import configparser
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _requirements():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["test"].splitlines()
    reqs = [Requirement(l.strip()) for l in lines if l.strip() and not l.strip().startswith("#")]
    return {r.name.lower(): r for r in reqs}


def test_constraints_pin_the_installed_versions_inside_the_ranges():
    reqs = _requirements()
    pins = [
        Requirement(l)
        for l in (REPO / "constraints.txt").read_text().splitlines()
        if l.strip() and not l.startswith("#")
    ]
    for pin in pins:
        (exact,) = pin.specifier
        assert exact.operator == "==", pin
        assert reqs[pin.name.lower()].specifier.contains(exact.version), (
            f"{pin} is outside setup.cfg's {reqs[pin.name.lower()]}"
        )
        assert version(pin.name).split("+")[0] == exact.version, f"installed {pin.name} {version(pin.name)} != {pin}"
    for name in ("torch", "transformers", "torchtune", "torchao", "lhotse"):
        spec = reqs[name].specifier
        assert any(s.operator == "<" for s in spec) and not any(s.operator == "==" for s in spec), reqs[name]
