from sidecar.launch import main

raise SystemExit(main())
