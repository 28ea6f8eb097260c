from qwen_daemon.cli import main

raise SystemExit(main())
