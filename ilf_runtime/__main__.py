from ilf_runtime.cli import main

raise SystemExit(main())
