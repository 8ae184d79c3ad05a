from yolo_admm.cli import main

raise SystemExit(main())
