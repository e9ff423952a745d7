//! `wnodes-scratch`: the scratch service binary (see the library docs for the modules).

fn main() -> std::process::ExitCode {
    wnodes_runtime::main::<wnodes_scratch::ScratchConfig, _, _>("scratch", 0, |ctx| async move {
        let consumer = wnodes_scratch::start(
            ctx.bus.clone(),
            ctx.store.clone(),
            ctx.tuning().clone(),
            &ctx.common.host,
            &ctx.config,
            &ctx.state_dir,
        )
        .await?;
        ctx.ready.set_ready();
        consumer.run(ctx.shutdown.clone()).await?;
        Ok(())
    })
}
