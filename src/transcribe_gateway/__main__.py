import sys

from transcribe_gateway.cli import main

sys.exit(main())
