from hftlab.cli import main

raise SystemExit(main())
