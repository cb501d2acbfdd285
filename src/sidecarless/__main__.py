from sidecarless.cli.main import main

raise SystemExit(main())
