FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mesh ./mesh
RUN pip install --no-cache-dir ".[agents]"
# The reference mesh: not part of the installed library (which is only `mesh`), imported
# from /app, the working directory every `mesh` command runs in (as in the repository)
COPY agents ./agents
COPY topics ./topics
COPY schemas ./schemas
ENV PYTHONPATH=/app
USER nobody
ENTRYPOINT []
