#!/usr/bin/env python
"""usdet: breast-lesion detection in ultrasound with detectron2 (see README.md).

detectron2 itself is not listed: it is not on PyPI. `make setup` uses an importable detectron2
when there is one and otherwise runs tools/install_detectron2.py (README, 'Installing detectron2').
"""
from setuptools import find_packages, setup


def _requirements():
    with open("requirements.txt") as fh:
        lines = (ln.split("#")[0].strip() for ln in fh)
        return [ln for ln in lines if ln and not ln.startswith(("pytest",))]


setup(
    name="usdet",
    version="0.1.0",
    description="Breast-lesion detection in ultrasound with detectron2 Faster R-CNN",
    packages=find_packages(include=("usdet", "usdet.*")),
    python_requires=">=3.9",
    install_requires=["torch>=1.10", "torchvision>=0.11"] + _requirements(),
)
