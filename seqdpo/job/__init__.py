"""A job's bookkeeping around its training: whose directory it is (`directory`), one live job per
directory (`lock`), what it is doing (`status`), what it says (`log`, `progress`) and what a rerun
resumes from (`resume`). The job itself is `seqdpo.runner`."""
