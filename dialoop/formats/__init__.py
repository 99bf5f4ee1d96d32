"""Import and export of conversations and preference data."""

from dialoop.formats.records import ChatExample, ChatMessage, RankingExample

__all__ = ["ChatExample", "ChatMessage", "RankingExample"]
