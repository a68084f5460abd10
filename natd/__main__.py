import sys

from natd.daemon import main

sys.exit(main())
