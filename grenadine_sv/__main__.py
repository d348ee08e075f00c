from grenadine_sv.cli.main import main

raise SystemExit(main())
