"""Tasks (registered like memories), the equal-budget harness and the leaderboard."""
