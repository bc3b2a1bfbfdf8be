"""Size limits that the gRPC servers, the channels that call them and the gateway share.

One number, so a message that one side accepts is never too big for the next hop.
"""

from __future__ import annotations

# Messages up to 16 MiB: a full batch of 1000 agents fits with room to spare. The
# gateway admits request bodies up to the same size.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# A call's metadata (its headers, or its trailers), as gRPC counts it. gRPC refuses
# metadata past it with RESOURCE_EXHAUSTED, and an HTTP/2 header block that grows past
# it (CONTINUATION frames without end) with a reset, before the block is complete.
# Its own defaults refuse at random between 8 and 16 KiB (a soft and a hard limit);
# one number makes the answer certain, above the gateway's 8 KiB request head.
MAX_METADATA_BYTES = 16 * 1024
# The options every server and every channel is made with.
GRPC_SIZE_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
)
# The longest id of any resource (agents and workflows: 128 characters; executions
# and keys are shorter): a request naming a longer one names nothing.
MAX_ID_LENGTH = 128
