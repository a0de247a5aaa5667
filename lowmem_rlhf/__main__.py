from lowmem_rlhf.cli import main

raise SystemExit(main())
