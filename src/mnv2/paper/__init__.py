"""The reproduction report: the paper's tables beside what this code measures."""
