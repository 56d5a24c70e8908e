"""The gateway's second transport: an OpenAI-compatible HTTP API (FastAPI, served by uvicorn in the gateway's own
event loop) over the same chat service as the gRPC one.

- `schema.py`: the request bodies (OpenAI's names, vLLM's for the rest), validated by pydantic;
- `convert.py`: a request body -> the domain's ChatInput, and a domain error's field -> the JSON path the caller used;
- `render.py`: ChatDeltas -> OpenAI's chat.completion and chat.completion.chunk objects;
- `errors.py`: domain and validation errors -> OpenAI's error body and the HTTP status that fits;
- `guard.py`: what every call goes through before the app reads it: the bearer token, the body size limit, the
  drain, the request counter;
- `app.py`: the routes, and the chat's answer (JSON or server-sent events) that ends the chat when its client
  leaves;
- `server.py`: uvicorn on the gateway's loop, started and stopped by the gateway role.
"""
