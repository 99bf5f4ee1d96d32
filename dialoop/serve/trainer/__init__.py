"""The trainer workspace: demonstrations with streamed model suggestions, ranking comparison tasks, the guide.

Every route needs the trainer or admin role and every state-changing call the CSRF token; all the work
goes through `dialoop.collect`, the functions the simulated trainers use. Trainers chat on the chat page:
their chats are training data, and comparison tasks start from the model's replies in them.

Pages: /trainer, /trainer/demonstrations, /trainer/demonstrations/{did}, /trainer/rank,
/trainer/rank/{tid}, /trainer/rankings, /guide. The pages' scripts talk to:

    GET    /api/trainer/demonstrations                     my demonstrations, newest first
    POST   /api/trainer/demonstrations                     {title?, system_prompt?}: a new draft
    GET    /api/trainer/demonstrations/{did}               the demonstration and its turns
    DELETE /api/trainer/demonstrations/{did}               (not once accepted)
    POST   /api/trainer/demonstrations/{did}/turns         {role, content, suggestion?, replace_last?}
    PUT    /api/trainer/demonstrations/{did}/turns/{mid}   {content}: the autosave of a turn
    DELETE /api/trainer/demonstrations/{did}/turns/{mid}   the last turn only
    POST   /api/trainer/demonstrations/{did}/suggestions   {n, temperature, ...}: event stream of n replies
    POST   /api/trainer/suggestions/{gid}/stop             cancel a suggestion stream on the server
    POST   /api/trainer/demonstrations/{did}/submit        hand it in for review
    POST   /api/trainer/tasks/next                         my next comparison task (made on demand)
    GET    /api/trainer/tasks/{tid}                        a task I may answer, or answered (to change it)
    POST   /api/trainer/tasks/{tid}/ranking                {order, ties, all_bad, flags}
    POST   /api/trainer/tasks/{tid}/skip                   {reason, flags}
    GET    /api/trainer/rankings                           my answers, newest first

Suggestion streams are `data: {json}` lines: `start` (generation id, n), `delta` (index, text), `end`
(index, finish reason), then `done` (the n suggestions) or `error`. Suggestions are kept by the server
(not stored) until one is inserted as a turn, which records it as the turn's origin.
"""

from __future__ import annotations

from dialoop.serve.pages import add_nav_link
from dialoop.serve.trainer import demonstrations, pages, suggestions, tasks
from dialoop.serve.trainer.common import router

# the modules that put their routes on `router` when imported
DOMAINS = (demonstrations, suggestions, tasks, pages)

add_nav_link("Trainer", "/trainer", "trainer", "admin")

__all__ = ["router"]
