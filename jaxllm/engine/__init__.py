"""Device-free engine: requests, block manager, scheduler, detokenizer, engine loop. No jax here.

    AsyncEngine (thread <-> asyncio)  or  LLM (offline)
      -> LLMEngine.add_request: validate, fan out n > 1 into child `Request`s
      -> LLMEngine.step:
           Scheduler.schedule (token budget; BlockManager pages, prefix cache) -> SchedulerOutput
           runner.execute(SchedulerOutput) -> StepHandle (interfaces.py; FakeModelRunner in tests)
           Scheduler.update_from_output -> sampled tokens
           OutputDetokenizer: text, stop conditions -> finished requests free their pages
      -> RequestOutput (cumulative, or DELTA for streaming) and EngineMetrics
"""
