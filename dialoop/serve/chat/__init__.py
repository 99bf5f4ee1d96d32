"""The chat: private conversations with the served models, as pages and as a JSON + streaming API.

Pages: `GET /chat` (a new chat) and `GET /chat/{id}`. The page's script talks to `/api/chat`; every
state-changing call carries the CSRF header, and a conversation is visible only to its owner (anyone
else gets 404, whatever their role).

    GET    /api/chat/models                                   models to pick from, and the served one
    GET    /api/chat/conversations                            the user's chats, newest first
    POST   /api/chat/conversations                            {title?, system_prompt?}
    GET    /api/chat/conversations/{cid}                      the whole message tree
    PATCH  /api/chat/conversations/{cid}                      {title?, system_prompt?}
    DELETE /api/chat/conversations/{cid}
    POST   /api/chat/conversations/{cid}/messages             {parent_id, content, model?, ...}: event stream
    POST   /api/chat/conversations/{cid}/messages/{mid}/replies   another reply to user message mid: stream
    POST   /api/chat/conversations/{cid}/generations/{gid}/stop   cancel that generation on the server
    PUT    /api/chat/conversations/{cid}/messages/{mid}/feedback  {value: 1 | -1 | 0} thumbs up/down/none
    POST   /api/chat/conversations/{cid}/messages/{mid}/preference {other_id}: mid is better than other_id

An edit is a new user message next to the edited one (same parent); a regeneration is a new reply next
to the old one. Event streams are `data: {json}` lines: `user` (the new user message), `start`
(generation id), `delta` (text), then `done` (the saved reply) or `error`.
"""

from __future__ import annotations

from dialoop.serve.chat import conversations, replies
from dialoop.serve.chat.common import router

# the modules that put their routes on `router` when imported
DOMAINS = (conversations, replies)

__all__ = ["router"]
