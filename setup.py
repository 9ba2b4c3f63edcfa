"""Only for the optional C fast path of the DATA reader; metadata is in pyproject.toml.

`optional=True`: where no C compiler is present the build goes on without it and
relay/smtp/data.py does all the work in Python (slower, same results).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("relay.smtp._scan", ["relay/smtp/_scan.c"], optional=True)])
