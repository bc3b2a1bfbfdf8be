from services.workflows.server import main
from services.common import event_loop

event_loop.run(main())
