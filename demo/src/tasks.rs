//! The demo's tasks: `demo.add`, `demo.sum`, `demo.sleep`, `demo.flaky`, `demo.count` (for the CLI and
//! foreign clients to call) and `shop.order_created` (the order confirmation e-mail).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::format_cents;
use super::orders::{Order, OrderStore};
use switchyard::mail::{Email, Mailer};
use switchyard::tasks::{ResultExt, Task, TaskContext, TaskError};

/// The longest `demo.sleep` accepts, in seconds.
const MAX_SLEEP_SECS: f64 = 3600.0;

/// `demo.add`: `{"x": 2, "y": 3}` → `5`.
pub struct Add;

/// Arguments of `demo.add`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddArgs {
    pub x: i64,
    pub y: i64,
}

impl Task for Add {
    const NAME: &'static str = "demo.add";
    type Args = AddArgs;
    type Output = i64;

    async fn run(&self, _ctx: TaskContext, args: AddArgs) -> Result<i64, TaskError> {
        args.x.checked_add(args.y).ok_or_else(|| {
            TaskError::fail("overflow", format!("{} + {} overflows", args.x, args.y))
        })
    }
}

/// `demo.sum`: `{"values": [1, 2]}` → `3`; the sum of integers is an integer (an overflow is
/// an error), with any non-integer it is a float. A chord's usual callback.
pub struct Sum;

/// Arguments of `demo.sum`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SumArgs {
    pub values: Vec<serde_json::Number>,
}

impl Task for Sum {
    const NAME: &'static str = "demo.sum";
    type Args = SumArgs;
    type Output = serde_json::Number;

    async fn run(&self, _ctx: TaskContext, args: SumArgs) -> Result<serde_json::Number, TaskError> {
        sum(&args.values)
    }
}

/// The sum of `values`: an integer while every value is one, else a float.
pub fn sum(values: &[serde_json::Number]) -> Result<serde_json::Number, TaskError> {
    let ints: Option<Vec<i64>> = values.iter().map(serde_json::Number::as_i64).collect();
    if let Some(ints) = ints {
        return ints
            .iter()
            .try_fold(0i64, |acc, v| acc.checked_add(*v))
            .map(serde_json::Number::from)
            .ok_or_else(|| TaskError::fail("overflow", "the sum overflows a 64-bit integer"));
    }
    let total: f64 = values.iter().filter_map(serde_json::Number::as_f64).sum();
    serde_json::Number::from_f64(total)
        .ok_or_else(|| TaskError::fail("overflow", "the sum is not a finite number"))
}

/// `demo.sleep`: `{"seconds": 1.5}` → the seconds slept. Stops early, returning what it slept,
/// when its cancellation token fires (soft time limit, cold shutdown).
pub struct Sleep;

/// Arguments of `demo.sleep`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SleepArgs {
    pub seconds: f64,
}

impl Task for Sleep {
    const NAME: &'static str = "demo.sleep";
    type Args = SleepArgs;
    type Output = f64;

    async fn run(&self, ctx: TaskContext, args: SleepArgs) -> Result<f64, TaskError> {
        if !args.seconds.is_finite() || !(0.0..=MAX_SLEEP_SECS).contains(&args.seconds) {
            return Err(TaskError::fail(
                "bad_args",
                format!(
                    "seconds must be from 0 to {MAX_SLEEP_SECS}, got {}",
                    args.seconds
                ),
            ));
        }
        let started = Instant::now();
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs_f64(args.seconds)) => {}
            () = ctx.cancelled() => {}
        }
        Ok(started.elapsed().as_secs_f64())
    }
}

/// `demo.flaky`: `{"fail_times": 2}` fails that many attempts of one task id (retryably), then
/// succeeds with the number of the attempt that did. The attempt comes from the task context
/// (the retries the result record counts), so it holds across worker processes.
#[derive(Default)]
pub struct Flaky;

/// Arguments of `demo.flaky`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlakyArgs {
    pub fail_times: u32,
}

impl Task for Flaky {
    const NAME: &'static str = "demo.flaky";
    type Args = FlakyArgs;
    type Output = u32;

    async fn run(&self, ctx: TaskContext, args: FlakyArgs) -> Result<u32, TaskError> {
        let attempt = ctx.attempt();
        if attempt <= args.fail_times {
            return Err(TaskError::retry(
                "flaky",
                format!("attempt {attempt} of {} planned failures", args.fail_times),
            ));
        }
        Ok(attempt)
    }
}

/// The most steps `demo.count` counts (10,000 steps of 100 ms: under 17 minutes).
const MAX_COUNT: u64 = 10_000;

/// `demo.count`: `{"to": 10}` counts to `to`, one step per 100 ms, reporting its progress
/// (`done` of `total`) after each step; the result is `to`. Stops early, failing, when its
/// cancellation token fires.
pub struct Count;

/// Arguments of `demo.count`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CountArgs {
    pub to: u64,
}

impl Task for Count {
    const NAME: &'static str = "demo.count";
    type Args = CountArgs;
    type Output = u64;

    async fn run(&self, ctx: TaskContext, args: CountArgs) -> Result<u64, TaskError> {
        if args.to > MAX_COUNT {
            return Err(TaskError::fail(
                "bad_args",
                format!("to must be at most {MAX_COUNT}, got {}", args.to),
            ));
        }
        ctx.progress(0, args.to, serde_json::json!({"step": 0}))
            .await;
        for step in 1..=args.to {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = ctx.cancelled() => {
                    return Err(TaskError::fail("cancelled", format!("stopped at step {}", step - 1)));
                }
            }
            ctx.progress(step, args.to, serde_json::json!({"step": step}))
                .await;
        }
        Ok(args.to)
    }
}

/// Arguments of `shop.order_created`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderCreatedArgs {
    pub order_id: u64,
}

/// The name of the order confirmation task.
pub const ORDER_CREATED: &str = "shop.order_created";

/// The queue the confirmation e-mails go to.
pub const EMAILS_QUEUE: &str = "emails";

/// `shop.order_created` (queue `emails`): the order confirmation e-mail. Idempotent under
/// redelivery: the mail is keyed by the task id, so a second run overwrites the same file.
pub async fn order_created(ctx: TaskContext, args: OrderCreatedArgs) -> Result<String, TaskError> {
    let orders = ctx.data::<dyn OrderStore>()?;
    let order = orders.get(args.order_id).await.or_retry("order_store")?;
    // Another node may not see a just-created order yet: retry.
    let order = order.ok_or_else(|| TaskError::retry("order_not_found", "no such order yet"))?;
    let subject = format!("Order #{} confirmed", order.id);
    let email = Email::new(&order.owner, &subject, receipt(&order));
    ctx.data::<Mailer>()?.send(ctx.id(), &email).await?;
    Ok(subject)
}

/// The confirmation e-mail's text.
fn receipt(order: &Order) -> String {
    let lines: Vec<String> = order
        .items
        .iter()
        .map(|i| {
            let subtotal = format_cents(i.price_cents * u64::from(i.quantity));
            let price = format_cents(i.price_cents);
            format!("  {} x {} at {price} = {subtotal}", i.quantity, i.name)
        })
        .collect();
    format!(
        "Hello {},\n\nthank you for your order #{}:\n\n{}\n\nTotal: {}\n",
        order.owner,
        order.id,
        lines.join("\n"),
        format_cents(order.total_cents)
    )
}
