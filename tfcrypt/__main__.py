import sys

from tfcrypt.cli import main

sys.exit(main())
