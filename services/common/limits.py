"""Size limits that the gRPC servers, the channels that call them and the gateway share.

One number, so a message that one side accepts is never too big for the next hop.
"""

from __future__ import annotations

# Messages up to 16 MiB: a full batch of 1000 agents fits with room to spare. The
# gateway admits request bodies up to the same size.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The longest id of any resource (agents and workflows: 128 characters; executions
# and keys are shorter): a request naming a longer one names nothing.
MAX_ID_LENGTH = 128
