from amrlhf.cli import main

raise SystemExit(main())
