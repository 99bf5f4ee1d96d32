"""Trainer workflows over the store: demonstrations with suggestions, chats, comparison tasks, rankings.

Human trainers (the web workspace) and simulated trainers (`dialoop.sim`) both act through these.
"""

from dialoop.collect.agreement import (
    AgreementReport,
    TrainerStats,
    collection_counts,
    pair_agreement,
    pairwise_agreement,
)
from dialoop.collect.chats import add_user_turn, chat_head, chat_reply, generate_chat_replies, start_chat
from dialoop.collect.common import PolicyHandle
from dialoop.collect.demonstrations import (
    Suggestion,
    add_turn,
    create_demonstration,
    delete_demonstration,
    demonstration_turns,
    edit_turn,
    remove_last_turn,
    review_demonstration,
    submit_demonstration,
    suggest_replies,
    suggest_replies_many,
)
from dialoop.collect.tasks import (
    FLAG_KINDS,
    TaskView,
    cancel_task,
    create_comparison_task,
    create_comparison_tasks,
    display_order,
    flagged_candidates,
    next_task_for,
    skip_task,
    submit_ranking,
    task_view,
)

__all__ = [
    "FLAG_KINDS",
    "AgreementReport",
    "PolicyHandle",
    "Suggestion",
    "TaskView",
    "TrainerStats",
    "add_turn",
    "add_user_turn",
    "cancel_task",
    "chat_head",
    "chat_reply",
    "collection_counts",
    "create_comparison_task",
    "create_comparison_tasks",
    "create_demonstration",
    "delete_demonstration",
    "demonstration_turns",
    "display_order",
    "edit_turn",
    "flagged_candidates",
    "generate_chat_replies",
    "next_task_for",
    "pair_agreement",
    "pairwise_agreement",
    "remove_last_turn",
    "review_demonstration",
    "skip_task",
    "start_chat",
    "submit_demonstration",
    "submit_ranking",
    "suggest_replies",
    "suggest_replies_many",
    "task_view",
]
