from graphresize.cli import main

raise SystemExit(main())
