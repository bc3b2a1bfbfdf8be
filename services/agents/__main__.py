import asyncio

from services.agents.server import main

asyncio.run(main())
