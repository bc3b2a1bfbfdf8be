from services.common import event_loop
from services.workflows.server import main

event_loop.run(main())
