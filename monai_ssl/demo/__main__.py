"""``python -m monai_ssl.demo``: build or reuse the demo dataset (see :func:`monai_ssl.demo.build.main`)."""

from monai_ssl.demo.build import main

raise SystemExit(main())
