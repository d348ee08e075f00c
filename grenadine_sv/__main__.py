from grenadine_sv.cli.main import entry

entry()
