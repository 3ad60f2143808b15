from wecom_bridge.cli import main

raise SystemExit(main())
