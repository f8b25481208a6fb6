from convnet.cli.parser import main

raise SystemExit(main())
