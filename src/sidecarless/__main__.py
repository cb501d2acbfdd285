from sidecarless.cli import main

raise SystemExit(main())
