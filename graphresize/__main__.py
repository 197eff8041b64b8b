from graphresize.cli.main import main

raise SystemExit(main())
