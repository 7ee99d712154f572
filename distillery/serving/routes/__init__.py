"""One router per API: native, OpenAI, AUTOMATIC1111, admin (and the playground page). Routes read requests,
map them to the engine's Jobs and write answers; they never touch tensors, the registry or the engine's insides."""
