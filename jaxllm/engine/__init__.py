"""Device-free engine: requests, block manager, scheduler, detokenizer, the one engine loop. No jax here.

    EngineClient.generate (server) or LLM.generate (offline): validate (jaxllm.validation) -> AddRequest
      -> EngineCore.run (core.py), the one loop, on a thread, in the engine process, or on a follower:
           apply commands (AddRequest, Abort, GrammarReady, Shutdown) -> LLMEngine.add_request: n > 1 fans
           out into child `Request`s; a structured one waits for its grammar (compiled on a pool)
           LLMEngine.step:
             Scheduler.schedule (token budget; BlockManager pages, prefix cache) -> SchedulerOutput
             runner.execute(SchedulerOutput) -> StepHandle (interfaces.py; a fake runner in tests)
             Scheduler.update_from_output -> sampled tokens
             OutputDetokenizer: text, stop conditions -> finished requests free their pages
           -> EngineOutput per request (cumulative, DELTA for streaming, or FINAL_ONLY offline), EngineMetrics
      -> EngineClient (client.py): the caller's RequestOutput through its GenerationStream
"""
