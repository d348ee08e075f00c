from grenadine_sv.cli import main

raise SystemExit(main())
