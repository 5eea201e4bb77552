import re

from setuptools import find_packages, setup


def version() -> str:
    # dropr/__init__.py holds the version; read, not imported (its imports
    # need the dependencies this file is about to declare).
    with open("dropr/__init__.py", encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="dropr",
    version=version(),
    description="A store-and-forward message queue on the file system, on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["dropr", "dropr.*"]) + ["twisted.plugins"],
    package_data={
        "twisted": ["plugins/dropr_plugins.py"],
        "dropr": ["py.typed"], "dropr.monitoring": ["static/*.html", "static/*.js"],
    },
    install_requires=[
        # [tls]: pyOpenSSL and service_identity, for ssl: endpoints and for
        # checking servers' certificates (docs/dependencies.rst).
        "Twisted[tls]>=23.10",
        "treq>=23.11",
        "zope.interface>=6.0",
        "prometheus_client>=0.17",
    ],
    extras_require={
        # The PostgreSQL store (docs/dependencies.rst, docs/storages.rst).
        "postgresql": ["psycopg[binary]>=3.1", "psycopg_pool>=3.2"],
        "test": [
            "psycopg[binary]>=3.1",
            "psycopg_pool>=3.2",
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            # Makes the test CA and certificates of tests/test_tls.py.
            "cryptography>=42",
        ],
        "dev": [
            "mypy>=1.10",
            "mypy-zope>=1.0.5",
            "ruff>=0.5",
            "sphinx>=7",
        ],
    },
    entry_points={"console_scripts": ["dropr = dropr.admin.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
