import asyncio

from services.workflows.server import main

asyncio.run(main())
