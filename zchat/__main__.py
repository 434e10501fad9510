from zchat.cli import main

raise SystemExit(main())
